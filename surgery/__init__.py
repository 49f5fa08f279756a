"""Model surgery: knowledge editing (ROME in the r-ROME form, MEMIT, AlphaEdit, constrained fine-tuning) and
control vectors (repeng / llama.cpp compatible).

    from workbench.surgery import EditRequest, edit_model
    req = EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome")
    with edit_model(model, tok, [req], method="rome") as res:
        ...  # edited here, restored bit-exactly on exit

Import this package as ``workbench.surgery``. The bare name ``surgery`` belongs to another PyPI
project; when the repository root is on ``sys.path`` this folder would shadow it, so under any other
name it hands the name to that project when it is installed, else it is an empty shell (no ``__file__``,
no submodules). See ``workbench/_shadow.py``.
Exports load lazily: importing the package has no side effects.
"""

if __name__ != "workbench.surgery":
    from workbench._shadow import stand_aside

    stand_aside(globals())  # an empty shell; the PyPI project of this name, when installed, takes its place
    del stand_aside
else:
    _EXPORTS = {
        "EditRequest": "requests", "BadRequestError": "requests", "load_requests": "requests",
        "save_requests": "requests", "target_ids": "requests",
        "edit_model": "edit", "Editor": "edit", "EditResult": "edit", "load_edit": "edit", "METHODS": "edit",
        "compute_stats": "stats", "StatsConfig": "stats",
        "ROMEHparams": "hparams", "MEMITHparams": "hparams", "AlphaEditHparams": "hparams", "FTHparams": "hparams",
        "load_hparams": "hparams",
        "ControlVector": "control", "DatasetEntry": "control", "steer": "steer",
    }
    __all__ = sorted(_EXPORTS)



def __getattr__(name: str):
    if __name__ == "workbench.surgery" and name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
