#!/usr/bin/env bash
# The `make demo` job: synthesise the embedded default datasets and check them.
# (Training, prediction and the report join this script as those commands land.)
set -euo pipefail
MEDSEG="${MEDSEG:-medseg}"
DEMO_DIR="${DEMO_DIR:-demo_out}"
CT_CASES="${CT_CASES:-10}"
CXR_CASES="${CXR_CASES:-20}"

mkdir -p "$DEMO_DIR"
# The demo owns these folders: regenerate them from the seed each run.
rm -rf "$DEMO_DIR/ct" "$DEMO_DIR/chest_xray"

echo "== 1/4 synthetic CT phantoms ($CT_CASES cases, MSD layout, some held-out cases also as DICOM)"
"$MEDSEG" data synth ct --out "$DEMO_DIR/ct" --cases "$CT_CASES" --seed 0
echo "== 2/4 synthetic chest X-ray phantoms ($CXR_CASES cases, SCR layout)"
"$MEDSEG" data synth chest_xray --out "$DEMO_DIR/chest_xray" --cases "$CXR_CASES" --seed 0

echo "== 3/4 dataset checks"
"$MEDSEG" data check --config configs/demo_ct.yaml --set data.root="$DEMO_DIR/ct" --no-progress
"$MEDSEG" data check --config configs/demo_chest_xray.yaml --set data.root="$DEMO_DIR/chest_xray" --no-progress

echo "== 4/4 geometry of one NIfTI case and one DICOM series"
first_ct=$(ls "$DEMO_DIR"/ct/imagesTr/*.nii.gz | head -n 1)
"$MEDSEG" info "$first_ct"
first_dicom=$(ls -d "$DEMO_DIR"/ct/dicomTs/*/ 2>/dev/null | head -n 1 || true)
if [ -n "$first_dicom" ]; then "$MEDSEG" info "$first_dicom"; fi

echo
echo "Demo outputs:"
echo "  CT phantoms (MSD layout):        $DEMO_DIR/ct"
echo "  chest X-ray phantoms (SCR):      $DEMO_DIR/chest_xray"
