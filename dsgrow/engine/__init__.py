"""DeepSpeed glue. The only package of dsgrow that imports deepspeed (lazily, inside functions)."""
