"""The loop's actions, each written once: request a retrain, roll out, roll back, describe the deployment.

The CLI, the admin routes and the drift monitor all act through here. It reaches the Serve application
through its import path and the retrain job through its entrypoint, both strings: nothing here imports
serve/, tune/ or monitoring/.
"""
