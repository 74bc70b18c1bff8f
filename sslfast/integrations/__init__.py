"""One-line integrations of sslfast into other libraries' models.

``sslfast.integrations.transformers``: ``apply_sslfast_to_wav2vec2()`` puts Hugging Face
transformers' wav2vec 2.0 family (pretraining, quantizer, masking) on sslfast's fused ops.
Importing this package does not import transformers.
"""
