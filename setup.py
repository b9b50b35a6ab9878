"""Vaurien: one module, no runtime dependencies."""

from setuptools import setup

with open('README.txt', encoding='utf-8') as readme:
    long_description = readme.read()

setup(
    name='vaurien',
    version='3.1.0',
    description='A chaos TCP proxy: delays, breaks, hangs, cuts or corrupts the traffic '
                'to a backend, on demand, for tests.',
    long_description=long_description,
    long_description_content_type='text/plain',
    license='Apache-2.0',
    py_modules=['vaurien'],
    # handlers/ is installed as vaurien_handlers: "handlers" is a name users' own
    # packages take; vaurien.py finds handlers/ as vaurien_handlers in a checkout
    packages=['vaurien_handlers'],
    package_dir={'vaurien_handlers': 'handlers'},
    python_requires='>=3.8',
    entry_points={'console_scripts': ['vaurien=vaurien:main'],
                  'pytest11': ['vaurien = vaurien']},   # its fixtures, when installed
    classifiers=[
        'License :: OSI Approved :: Apache Software License',
        'Programming Language :: Python :: 3',
        'Topic :: Software Development :: Testing',
        'Topic :: System :: Networking',
    ],
)
