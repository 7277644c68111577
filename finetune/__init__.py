"""Training data from program traces and PEFT training (``reflectagent.finetune``); see issue 6."""
