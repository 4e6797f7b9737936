import pytest


@pytest.fixture(scope="module", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """A JAX compilation cache for the experiment runs these tests start as subprocesses (they inherit it from the
    environment): a rerun of the same command (resume, SIGKILL, a killed sweep) loads the executables its first run
    compiled instead of compiling them again, which halves the slowest tests. Set for one test module at a time, so
    no other test's subprocesses see it; JAX in the test process itself was configured at import and ignores it."""
    path = str(tmp_path_factory.mktemp("jax_cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_COMPILATION_CACHE_DIR", path)
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
        yield path
