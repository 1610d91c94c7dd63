import os

# before anything imports torch (see common/__init__.py): spinning OpenMP waits make torch crawl when the test's
# DataLoader workers or DeepSpeed ranks share the two cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402

import pytest  # noqa: E402

_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_rendezvous_environment_left():
    """In-process runs make a world of one through the environment: a later test, or a subprocess it starts,
    must not inherit it, whatever the order."""
    saved = {k: os.environ.get(k) for k in _RENDEZVOUS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _no_logging_setup_left():
    """A CLI called in-process sets up the root logger (pretrain replaces its handlers): a later test, whatever the
    order, must find it as pytest left it, or its stderr holds another test's log lines."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:  # pytest adds and removes its own capture handlers around each phase
        if handler not in handlers and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(autouse=True, scope="session")
def _no_process_group_left():
    """The world of one those runs join is destroyed when the session ends. Not after each test: DeepSpeed
    caches its groups per process, so an engine built after a destroy fails; every test that needs a group
    joins the existing one or makes it (``pretrain.engine.init_distributed``), so order does not matter."""
    yield
    dist = sys.modules.get("torch.distributed")  # not imported by sessions that never touch torch
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
