"""Terminal chat and conversation history under a token budget."""
