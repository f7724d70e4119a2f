"""ctnode: a DICOM node that scores COVID-19 lung involvement on chest CT."""
__version__ = "0.1.0"
