"""Session fixtures for the speed benchmarks (see test_attention_speed.py for how to run them)."""
import pytest

from fusedattn import _bench


def pytest_addoption(parser):
    parser.addoption("--attn-threads", type=int, default=None, metavar="N",
                     help="threads for fusedattn, torch and NumPy's BLAS (default: fusedattn.get_num_threads())")


@pytest.fixture(scope="session")
def threads(request) -> int:
    """The one thread count every library runs with."""
    import fusedattn

    return request.config.getoption("--attn-threads") or fusedattn.get_num_threads()


@pytest.fixture(scope="session")
def torch_module():
    """``(torch, None)``, or ``(None, reason)`` when torch cannot be imported."""
    return _bench.load_torch()


@pytest.fixture(scope="session", autouse=True)
def pinned_threads(threads, torch_module):
    """Hold every thread pool at ``threads`` for the whole session.

    Depends on ``torch_module`` so torch is imported first and its pool gets pinned too.
    """
    with _bench.limit_threads(threads) as description:
        yield description


@pytest.fixture(scope="session")
def machine(threads) -> _bench.Machine:
    """The fp32 peak and read bandwidth on ``threads`` threads, probed once per session (~3 s)."""
    return _bench.measure_machine(threads)


@pytest.fixture(scope="session")
def best_s() -> dict:
    """``(case label, library)`` -> best time in seconds, filled as the benchmarks run.

    The parametrisation runs torch, then fusedattn, then its forced-ISA variants on each case, so a
    later benchmark can report its ratio to a time measured in the same session and machine state.
    """
    return {}
