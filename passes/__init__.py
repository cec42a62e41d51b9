"""Graph passes of the infinitehip backend, one FX rewrite per file (order: ihip_compile.pipeline)."""
