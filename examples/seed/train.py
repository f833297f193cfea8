"""Train the example's model inside the environment it will be served from (as the example does)."""

import sys

import joblib
from sklearn import datasets, svm
from sklearn.model_selection import train_test_split

digits = datasets.load_digits()
data = digits.images.reshape((len(digits.images), -1))
classifier = svm.SVC(gamma=0.001)
X_train, X_test, y_train, y_test = train_test_split(data, digits.target, test_size=0.5, shuffle=False)
classifier.fit(X_train, y_train)
joblib.dump(classifier, sys.argv[1] if len(sys.argv) > 1 else "model.joblib")
