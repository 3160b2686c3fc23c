"""What the test suite and the benchmark share to run the gateway against real parts.

Not part of the installed package (pyproject's packages.find takes only gateway*): it is
imported from the repository root, which is on sys.path when pytest or `python -m bench.run`
runs from there. `harness` has the simulator on a port, its credentials, free ports and the
daemon as a process; `s3server` has SeaweedFS as a real, SigV4-checking S3.
"""
