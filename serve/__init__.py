"""Ray Serve application: HTTP ingress and the batched classifier."""
