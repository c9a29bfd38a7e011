"""Pure-torch math of each method's structure; imports nothing of peft or of the rest of hirank."""
