"""What the tests share besides fixtures (those live in the conftest.py files): images, a tiny registered
model, the one way to run the real Serve app, the one load generator, fault measurement, recorded figures,
v2 tensor encodings, fakes of Ray's job service and of a model backend; and kserve_probe.py, a program the
tests run outside the project's venv."""
