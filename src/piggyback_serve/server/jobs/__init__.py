"""Training jobs: untrusted archives in, trained tasks out (POST /tasks/{name}/train)."""
