"""Model surgery: ROME/MEMIT-style editing, control vectors, hallucination engines.

Import this package as ``workbench.surgery``. The bare name ``surgery`` belongs to another PyPI
project; when the repository root is on ``sys.path`` this folder would shadow it, so under any other
name it is an empty shell (no ``__file__``, no submodules). See ``kernels/__init__.py``.
"""

if __name__ != "workbench.surgery":
    __file__ = None  # noqa: A001 - marks a shadowing folder, not an installed package
    __path__ = []  # no submodule of this folder can be imported under the bare name
