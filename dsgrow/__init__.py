"""dsgrow: grow transformers instead of training them from scratch, on DeepSpeed.

Importing dsgrow never imports deepspeed; only dsgrow.engine does.
"""
__version__ = "0.1.0"
