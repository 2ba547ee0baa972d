"""InternVL-style vision pieces shared by the Llama-Nemotron-VL families: dynamic tiling (server process,
Pillow + numpy), the `<image>` prompt expansion, checkpoint key layouts, and the torch runner."""
