import pytest

from se3jax.fiber import Fiber


def test_arithmetic_and_properties():
    f = Fiber.create(4, 32)
    assert f.num_components == 16 and f.num_features == 32 * 16
    assert (f // 2)[3] == 16
    assert (Fiber({0: 6}) + Fiber({0: 2, 1: 3})).structure == ((0, 8), (1, 3))
    assert Fiber({1: 4, 3: 4}).is_contiguous is False
    assert hash(Fiber({0: 1, 1: 2})) == hash(Fiber({1: 2, 0: 1}))


@pytest.mark.parametrize("bad", [{0: 0}, {-1: 3}, {}])
def test_invalid_fibers_are_rejected(bad):
    with pytest.raises(ValueError):
        Fiber(bad)


def test_check_features_names_the_problem():
    import numpy as np

    f = Fiber({0: 2, 1: 3})
    f.check_features({0: np.zeros((5, 2, 1)), 1: np.zeros((5, 3, 3))})
    with pytest.raises(ValueError, match=r"features\[1\] has shape"):
        f.check_features({0: np.zeros((5, 2, 1)), 1: np.zeros((5, 3, 1))})
    with pytest.raises(ValueError, match="degrees"):
        f.check_features({0: np.zeros((5, 2, 1))})
