import os

# before anything imports torch (see common/__init__.py): spinning OpenMP waits make torch crawl when the test's
# DataLoader workers or DeepSpeed ranks share the two cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
