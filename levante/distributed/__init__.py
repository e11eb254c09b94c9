"""Scale-out: tensor parallelism, and engine replicas on Ray (Serve and Data)."""
