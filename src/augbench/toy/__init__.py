"""The toy world and its foundation models: code that only the miniature needs.

`world` renders the target classes and the captioned pool, `clip` is the tiny CLIP (a CNN image
tower and CLIP's text tower, registered with transformers' AutoModel), `clip_train` and
`diffusion` pretrain it and the tiny latent diffusion model. A real run (ImageNet, LAION, Stable
Diffusion) imports none of it: a test parses `config/imagenet10.yaml` with this package made
unimportable.
"""

import os

if os.environ.get("AUGBENCH_FORBID_TOY"):  # set by the test that proves real runs do not need the toy code
    raise ImportError("augbench.toy imported while AUGBENCH_FORBID_TOY is set: a real run must not need the toy code")
