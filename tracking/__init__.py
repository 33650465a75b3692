"""MLflow tracking of the commands' results (the optional extra ``mlflow``): ``mlflow_runs`` logs runs,
``pyfunc_model`` turns a saved head into an MLflow model."""
