"""`motiontune lora check | convert | merge | resize`: tools around a LoRA file, one module per command.

`lora_file` reads a file into its entries (one adapted module each); `target` builds the transformer a file is meant
for (on the meta device from its config) and asks the family for the original-layout names. docs/formats.md has the
commands."""
