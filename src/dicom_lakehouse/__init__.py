"""dicom-lakehouse: a folder or bucket of DICOM files as a Delta Lake object catalog (one row per file)."""
