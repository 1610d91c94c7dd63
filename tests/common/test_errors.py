import pickle

from common.errors import DataError


def test_data_error_survives_pickling():
    # DataLoader workers send exceptions to the main process by pickling them
    e = pickle.loads(pickle.dumps(DataError("/x/a.nii.gz", "has NaN")))
    assert isinstance(e, DataError) and str(e) == "/x/a.nii.gz: has NaN" and e.problem == "has NaN"
