"""infinitehip: a torch.compile backend that rewrites attention into InfiniteHiP sparse attention.

    fast = torch.compile(model, backend="infinitehip", options={...})

Importing this package registers nothing with Dynamo (the backend is found through the
``torch_dynamo_backends`` entry point); it loads the ``ihip::`` ops lazily when a backend runs.
"""

from ihip_compile.config import IHipConfig, Stage

__all__ = ["IHipConfig", "Stage"]
