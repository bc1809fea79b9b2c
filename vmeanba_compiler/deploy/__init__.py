"""Deployment: AOTInductor packages of a rewritten model that run without Python (docs/DEPLOY.md).

`op_library`: the C functions a package calls for the project's ops (built on first use);
`package`: an ExportedProgram compiled into a package that calls them; `runner`: the C++ program
that loads and runs a package with libtorch alone.
"""
