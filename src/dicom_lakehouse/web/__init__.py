"""Serving the catalog: DICOMweb (WADO-RS, QIDO-RS), the OHIF viewer and the thumbnail gallery."""
