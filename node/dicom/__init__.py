"""DICOM protocol pieces shared by the listener, series selection and the export: header checks
(:mod:`.headers`), DIMSE statuses and refusal reasons (:mod:`.status`), Part-10 encoding (:mod:`.part10`),
TLS contexts (:mod:`.tls`), who may associate (:mod:`.access`) and the guarded transport under pynetdicom
(:mod:`.transport`)."""
