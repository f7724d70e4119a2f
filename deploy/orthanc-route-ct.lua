-- Auto-route CT to the ctnode DICOM node.
--
-- Installed through "LuaScripts" in orthanc.json (see deploy/README.md).
-- When a study becomes stable (no new instance for "StableAge" seconds), each
-- of its CT series is sent by C-STORE to the DICOM modality "ctnode".
--
-- The node answers by C-STORing a SEG and an SR into the same study, which
-- makes the study unstable and then stable again: to avoid a loop, every routed
-- series is stamped with the user metadata "CtnodeRouted" (declared in
-- orthanc.json "UserMetadata") holding the number of instances sent. A series
-- is sent again only if it has since grown (late slices); the node is expected
-- to deduplicate instances it already has.
--
-- Sends run as asynchronous Orthanc jobs, so the Lua engine is never blocked.
-- A failed send (node down) is a failed job in Orthanc (GET /jobs); resubmit it
-- with POST /jobs/<id>/resubmit.

local MODALITY = 'ctnode'
local ROUTED = 'CtnodeRouted'

local function RoutedCount(seriesId)
  local names = ParseJson(RestApiGet('/series/' .. seriesId .. '/metadata'))
  for _, name in ipairs(names) do
    if name == ROUTED then
      return tonumber(RestApiGet('/series/' .. seriesId .. '/metadata/' .. ROUTED)) or 0
    end
  end
  return 0
end

function OnStableStudy(studyId, tags, metadata)
  local resources = {}
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local count = #series['Instances']
    if series['MainDicomTags']['Modality'] == 'CT' and count > RoutedCount(series['ID']) then
      table.insert(resources, series['ID'])
      RestApiPut('/series/' .. series['ID'] .. '/metadata/' .. ROUTED, tostring(count))
    end
  end

  if #resources > 0 then
    local job = ParseJson(RestApiPost('/modalities/' .. MODALITY .. '/store',
      DumpJson({ Resources = resources, Asynchronous = true }, true)))
    print('ctnode: study ' .. studyId .. ': ' .. #resources ..
          ' CT series queued for ' .. MODALITY .. ' (job ' .. job['ID'] .. ')')
  end
end
