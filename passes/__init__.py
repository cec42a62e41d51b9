"""Graph passes of the infinitehip backend, one FX rewrite per file.

Their order lives in ``ihip_compile.pipeline.PASSES``.
"""
