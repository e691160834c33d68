"""dsgrow: grow transformers instead of training them from scratch, on DeepSpeed.

    import dsgrow
    engine, report = dsgrow.grow_engine(engine, target={"layers": 8, "hidden": 256}, method="fpi")

Importing dsgrow never imports deepspeed; only dsgrow.engine does (`grow_engine` and the other
engine-facing names below are loaded on first use).
"""
__version__ = "0.1.0"

# name -> module that defines it; resolved lazily so `import dsgrow` stays free of DeepSpeed.
_LAZY = {
    "grow_engine": "dsgrow.engine.grow",
    "keep_model": "dsgrow.engine.grow",
    "export_hf": "dsgrow.engine.export",
    "GrowthSchedule": "dsgrow.schedules.growth_schedule",
    "lr_schedule": "dsgrow.schedules.lr",
    "GrowthReport": "dsgrow.growth.report",
    "grow": "dsgrow.growth.api",
    "mup_model": "dsgrow.families.mup",
    "mup_param_groups": "dsgrow.families.mup",
    "set_lr": "dsgrow.engine.runtime",
    "Subnetwork": "dsgrow.subnet",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsgrow' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
