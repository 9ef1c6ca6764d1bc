"""dicom-lakehouse: create or update the job for a target and run it.

    python RUNME.py                      # resolve the bundle for the default (local) target
    python RUNME.py --run                # ... and run the job with the local runner
    python RUNME.py --target dev --run   # create/update the job on Databricks and run it
    python RUNME.py sql "SELECT ..."     # query the local warehouse with three-part names
"""

import sys
from pathlib import Path

try:
    from dicom_lakehouse.cli import main
except ImportError:  # running from a checkout without `pip install -e .` (e.g. a Databricks workspace)
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from dicom_lakehouse.cli import main

if __name__ == "__main__":
    main()
