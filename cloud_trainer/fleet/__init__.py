"""The fleet: who may connect, what the devices report, and operations on what they run.

- :mod:`~cloud_trainer.fleet.pki`        the broker's certificate authority (ECDSA P-256, CRL)
- :mod:`~cloud_trainer.fleet.provision`  identities, per-identity ACLs, password hashes, device config directories
- :mod:`~cloud_trainer.fleet.view`       one row per device from its retained state, availability, telemetry
- :mod:`~cloud_trainer.fleet.rollout`    a release's progress across the fleet; promote, pause, resume,
  withdraw, revert, pin (built on :mod:`cloud_trainer.releases`)
- :mod:`~cloud_trainer.fleet.dashboard`  the live web view of one fleet, and its actions
"""
