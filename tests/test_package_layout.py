"""The package's public names and its modules."""
from __future__ import annotations


def test_no_public_name_shadows_a_submodule():
    """``import attribution.metrics.X as m`` resolves ``X`` as an attribute of the package: a function of the same
    name as its module (``road``, ``evaluate`` and ``infidelity`` once were) would hand back the function."""
    import importlib
    import pkgutil

    import attribution

    packages = ["attribution"] + [p.name for p in pkgutil.walk_packages(attribution.__path__, "attribution.")
                                  if p.ispkg]
    for name in packages:
        parent = importlib.import_module(name)
        for info in pkgutil.iter_modules(parent.__path__):
            module = importlib.import_module(f"{name}.{info.name}")
            assert getattr(parent, info.name) is module, f"{name}.{info.name}"
    assert callable(attribution.metrics.road) and callable(attribution.metrics.evaluate)
