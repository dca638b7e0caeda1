"""Vision-language-action policies (OpenVLA, RT-2 style) with 256-bin action tokens."""
