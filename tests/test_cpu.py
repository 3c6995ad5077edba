"""The CPU probe: families, forcing another family's paths, and no bf16 where it is not native."""
import pytest

from murmur import cpu
from murmur.errors import MurmurError


@pytest.fixture
def probe(monkeypatch):
    """A fresh probe after the environment changes; cached again for the tests after."""
    def read(**env):
        for k in ("MURMUR_CPU", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        cpu.cpu_info.cache_clear()
        return cpu.cpu_info()
    yield read
    cpu.cpu_info.cache_clear()


def test_families_from_flags():
    assert cpu._family({"avx2", "fma"}) == "avx2"
    assert cpu._family({"avx2", "fma", "avx512"}) == "avx512"
    assert cpu._family({"avx2", "fma", "avx512", "avx512_bf16", "vnni"}) == "avx512_bf16"
    assert cpu._family({"avx512", "avx512_bf16", "amx", "amx_bf16"}) == "amx"
    assert cpu._family(set()) == "generic"


def test_real_probe_reads_this_machine(probe):
    info = probe()
    assert info.model and info.family in cpu.FAMILIES and info.forced is None


def test_forcing_avx2_turns_off_bf16(probe):
    info = probe(MURMUR_CPU="avx2")
    assert info.family in ("avx2", "generic") and not info.native_bf16 and not cpu.native_bf16()
    assert probe(ATEN_CPU_CAPABILITY="avx2").native_bf16 is False
    assert probe(ONEDNN_MAX_CPU_ISA="AVX2").native_bf16 is False


def test_forcing_never_raises_the_family(probe):
    real = probe().family
    assert probe(MURMUR_CPU="amx").family == real


def test_bad_family_is_a_clear_error(probe):
    with pytest.raises(MurmurError, match="MURMUR_CPU"):
        probe(MURMUR_CPU="sse9")
