"""AGRAmplifier's maxpool_amplify (kernel 2, over the size's layout), each backend next to the torch reference."""
import pytest

from .conftest import implementations
from robustagg import ops, reference


@pytest.mark.parametrize("impl", implementations("maxpool_amplify"))
def test_maxpool_amplify(bench_op, G, size, impl):
    bench_op("maxpool_amplify", impl, lambda backend: ops.maxpool_amplify(G, size.layout, 2, backend=backend),
             lambda: reference.maxpool_amplify(G, size.layout, 2))
