"""The quantization methods, one module each: its config, codecs, encoders and cache class.

Importing this package imports every module in it, so each cache class registers its ``method`` name (``registry``):
adding a method means adding a module here, and nothing else.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f".{_module.name}", __name__)
