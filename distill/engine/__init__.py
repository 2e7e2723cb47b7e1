"""The training engine: a runtime (device, precision, process), batches and teacher outputs as types, the
objective (loss terms from the registry), and a trainer that is the loop only, with callbacks for the rest."""
