"""A DICOM sender of the kind a PACS router is: pynetdicom's C-STORE SCU over several
associations at once, one thread per association.

    dicom_sender.py HOST PORT CALLED_AE CALLING_AE ASSOCIATIONS FILE_LIST

FILE_LIST holds one path per line; files are dealt round-robin to the associations. One JSON
line per file is printed (and flushed) as soon as its C-STORE response arrives:
{"file": PATH, "status": STATUS or null, "comment": ERROR_COMMENT}. A lost association (the
node killed mid-transfer) gives status null for that association's remaining files.
"""

import json
import sys
import threading

import pydicom
from pynetdicom import AE

HOST, PORT, CALLED, CALLING, ASSOCIATIONS, FILE_LIST = sys.argv[1:7]
files = [line.strip() for line in open(FILE_LIST) if line.strip()]
lock = threading.Lock()


def emit(path, status, comment=""):
    with lock:
        print(json.dumps({"file": path, "status": status, "comment": comment}), flush=True)


def send(paths):
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=CALLING)
    for ds in datasets:
        ts = ds.file_meta.TransferSyntaxUID
        ae.add_requested_context(ds.SOPClassUID, [ts])
    assoc = ae.associate(HOST, int(PORT), ae_title=CALLED)
    if not assoc.is_established:
        for p in paths:
            emit(p, None, "association failed")
        return
    for i, (path, ds) in enumerate(zip(paths, datasets)):
        try:
            status = assoc.send_c_store(ds)
        except Exception as e:  # the association broke
            status = None
            emit(path, None, str(e))
            continue
        if status is None or "Status" not in status:
            for p in paths[i:]:
                emit(p, None, "association lost")
            return
        emit(path, int(status.Status), str(status.get("ErrorComment", "")))
    assoc.release()


n = int(ASSOCIATIONS)
threads = [threading.Thread(target=send, args=(files[i::n],)) for i in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
