"""Task 'thumbnail' of the dicom-lakehouse job (see jobs/dicom_lakehouse.job.yml)."""

import sys

from dicom_lakehouse.jobs.taskmain import run_task

if __name__ == "__main__":
    sys.exit(run_task("thumbnail", sys.argv[1:]))
