"""Public ops: one module per op family. Each module registers its backends with
``sslfast._dispatch``, defines its ``torch.library`` custom ops (namespace ``sslfast``) and
the public function that validates arguments, resolves the backend and calls the op."""
