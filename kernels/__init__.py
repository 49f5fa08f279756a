"""Triton kernels for the workbench's hot paths, each with a plain-torch reference.

Import this package as ``workbench.kernels`` (setuptools maps this folder there). The bare name
``kernels`` belongs to another PyPI project (Hugging Face's kernel hub). When Python starts with the
repository root on ``sys.path`` (a REPL or ``python -c`` there), this folder would shadow that name,
so under any other name it hands the name to that project when it is installed (transformers imports
it) and is otherwise an empty shell: no ``__file__``, no submodules. See ``workbench/_shadow.py``.
"""

if __name__ != "workbench.kernels":
    from workbench._shadow import stand_aside

    stand_aside(globals())  # an empty shell; the PyPI project of this name, when installed, takes its place
    del stand_aside
