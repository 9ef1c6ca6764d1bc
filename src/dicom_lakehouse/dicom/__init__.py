"""DICOM files: headers to DICOM JSON, thumbnails, de-identification, the bundled samples. No Spark here."""
