"""Triton kernels for the workbench's hot paths, each with a plain-torch reference.

Import this package as ``workbench.kernels`` (setuptools maps this folder there). The bare name
``kernels`` belongs to another PyPI project (Hugging Face's kernel hub). When Python starts with the
repository root on ``sys.path`` (a REPL or ``python -c`` there), this folder would shadow that name,
so under any other name it hands the name to that project when it is installed (transformers imports
it) and is otherwise an empty shell: no ``__file__``, no submodules. See ``workbench/_shadow.py``.
"""

if __name__ != "workbench.kernels":
    import os as _os

    from workbench._shadow import hand_over as _hand_over

    _folder = _os.path.dirname(__file__)
    __file__ = None  # noqa: A001 - marks a shadowing folder, not an installed package
    __path__ = []  # no submodule of this folder can be imported under the bare name
    _hand_over(__name__, _folder)  # the PyPI project of this name, when installed, takes this place
