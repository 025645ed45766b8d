"""lorabox.train: QLoRA training with TRL SFTTrainer + PEFT + bitsandbytes, launched by `accelerate launch`."""
