"""``python -m cloud_trainer`` is ``cloud-train``."""

from cloud_trainer.cli import main

raise SystemExit(main())
