"""Weight-streaming linear layers for decode steps (few tokens): RMSNorm prologue, bias / SwiGLU / residual epilogues."""
