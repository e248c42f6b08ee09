"""In-context learning, the fourth regime: task families a small transformer learns from its prompt
(:mod:`polytask.icl.prompts` is the contract every sampler, model and probe shares)."""
