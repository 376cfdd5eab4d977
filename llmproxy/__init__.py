"""llmproxy: an intercepting proxy for LLM traffic, built from pluggy plugins.

Plugin authors need three names from here: ``hookimpl`` to mark hook implementations,
``ProxyError`` to refuse a flow with a client-visible error, and the types in
``llmproxy.canonical``. The contract itself is ``llmproxy.hookspecs``.
"""

from .errors import ProxyError
from .flow import Flow
from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["Flow", "ProxyError", "__version__", "hookimpl"]
