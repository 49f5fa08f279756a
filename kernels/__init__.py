"""Triton kernels for the workbench's hot paths, each with a plain-torch reference.

Import this package as ``workbench.kernels`` (setuptools maps this folder there). The bare name
``kernels`` belongs to another PyPI project (Hugging Face's kernel hub). When Python starts with the
repository root on ``sys.path`` (a REPL or ``python -c`` there), this folder would shadow that name,
so under any other name it turns itself into an empty shell: no ``__file__``, no submodules. Probes
such as transformers' ``is_kernels_available()`` then see "not installed" instead of our code.
"""

if __name__ != "workbench.kernels":
    __file__ = None  # noqa: A001 - marks a shadowing folder, not an installed package
    __path__ = []  # no submodule of this folder can be imported under the bare name
